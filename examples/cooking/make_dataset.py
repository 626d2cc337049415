#!/usr/bin/env python3
"""Generate the bundled cooking-assistant example dataset for edgeft.

Written for this project (edgeft). Every fact below is common, public
food-safety / kitchen knowledge: USDA safe minimum internal temperatures and
cold-storage guidance, standard US kitchen unit equivalences, oven temperature
conversions, candy/bread temperatures and well-known ingredient substitutions.

Design
------
* ``FACTS`` is a table of facts held as Python data.  Each fact has a category,
  ONE canonical assistant answer (a single short sentence, always the same for
  that fact, so a 135M model can memorise a consistent format quickly) and a
  list of short *accepted strings* (``answers``) that an automatic checker
  looks for in a model reply.
* Each fact also carries several paraphrased user questions.  Most facts list
  their questions by hand (the last one is the held-out eval phrasing); the
  internal-temperature and oven-conversion facts instead fill a subject slot
  in a shared pool of phrasing templates (``TEMP_TEMPLATES``,
  ``F2C_TEMPLATES``) and a seeded ``random.Random(0)`` picks which template is
  held out for eval.
* For every fact: 5 distinct question phrasings go to ``train.jsonl`` and one
  DIFFERENT phrasing (never present in train) goes to ``eval.jsonl``.  Train
  is shuffled deterministically; eval stays in fact order.

Answer checking rule (mirrored by ``matches`` below, used here only as a
self-check): a reply is correct if ANY accepted string occurs in it, compared
case-insensitively after collapsing whitespace; an accepted string that
starts/ends with a digit must not be adjacent to another digit in the reply
(so "165" does not match "1650").

Run:  python examples/cooking/make_dataset.py   (stdlib only, deterministic)
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_TRAIN_PER_FACT = 5

# --------------------------------------------------------------------------
# Phrasing templates
# --------------------------------------------------------------------------

TEMP_TEMPLATES = [
    "What temperature should {s} be cooked to?",
    "What's the safe minimum internal temperature for {s}?",
    "How hot does the inside need to get when I'm cooking {s}?",
    "What should my food thermometer read before I take {s} off the heat?",
    "USDA safe internal temp for {s}?",
    "To what internal temperature do I need to cook {s}?",
    "I'm cooking {s} tonight. What internal temperature means it's safe to eat?",
    "What internal temp makes {s} safe to eat?",
]

F2C_TEMPLATES = [
    "What is {f}°F in Celsius?",
    "Convert {f} degrees Fahrenheit to Celsius.",
    "My recipe says to bake at {f}°F but my oven is in Celsius. What should I set it to?",
    "{f} F to C for baking?",
    "How many degrees Celsius is a {f}°F oven?",
    "What's the Celsius equivalent of {f} Fahrenheit?",
    "I need to preheat to {f} degrees F; what is that in °C?",
]


def temp(subject, answer, accept):
    return {
        "cat": "internal_temps",
        "answer": answer,
        "answers": accept,
        "templates": TEMP_TEMPLATES,
        "slots": {"s": subject},
    }


def oven(f, answer, accept):
    return {
        "cat": "oven_conversions",
        "answer": answer,
        "answers": accept,
        "templates": F2C_TEMPLATES,
        "slots": {"f": f},
    }


def fact(cat, answer, accept, questions):
    """Hand-written questions; the LAST one is the held-out eval phrasing."""
    return {"cat": cat, "answer": answer, "answers": accept, "questions": questions}


# --------------------------------------------------------------------------
# Table of facts
# --------------------------------------------------------------------------

FACTS = [
    # ---------------- safe minimum internal temperatures (USDA) ----------------
    temp("chicken breasts", "Cook chicken breasts to 165°F (74°C), measured in the thickest part.", ["165"]),
    temp(
        "a whole turkey",
        "Cook a whole turkey to 165°F (74°C), checked in the thickest part of the thigh and breast.",
        ["165"],
    ),
    temp("ground beef burgers", "Cook ground beef and burgers to 160°F (71°C).", ["160"]),
    temp("ground turkey", "Cook ground turkey and ground chicken to 165°F (74°C).", ["165"]),
    temp("ground pork", "Cook ground pork and fresh pork sausage to 160°F (71°C).", ["160"]),
    temp("beef steaks", "Cook beef steaks and roasts to 145°F (63°C), then let the meat rest 3 minutes.", ["145"]),
    temp("pork chops", "Cook pork chops and pork roasts to 145°F (63°C), then let the meat rest 3 minutes.", ["145"]),
    temp("lamb chops", "Cook lamb chops and roasts to 145°F (63°C), then let the meat rest 3 minutes.", ["145"]),
    temp(
        "salmon fillets",
        "Cook fish such as salmon to 145°F (63°C), until the flesh is opaque and flakes with a fork.",
        ["145"],
    ),
    temp("a fresh, uncooked ham", "Cook a fresh, raw ham to 145°F (63°C), then let it rest 3 minutes.", ["145"]),
    fact(
        "internal_temps",
        "Cook egg dishes such as quiche, frittatas and egg casseroles to 160°F (71°C).",
        ["160"],
        [
            "What temperature should a quiche reach in the middle?",
            "How hot should an egg casserole be inside when it's done?",
            "Safe internal temperature for a frittata?",
            "What internal temp do egg dishes like strata need to hit?",
            "When I bake a breakfast egg bake, what temperature should the center be?",
            "How do I know my quiche is cooked safely? What should the thermometer say?",
        ],
    ),
    fact(
        "internal_temps",
        "Reheat leftovers to 165°F (74°C) all the way through.",
        ["165"],
        [
            "What temperature should leftovers be reheated to?",
            "How hot do reheated leftovers need to get to be safe?",
            "Safe reheating temperature for leftover food?",
            "When I warm up last night's dinner, what internal temp should it reach?",
            "To what temperature do I need to reheat cooked leftovers?",
            "I'm microwaving leftover pasta bake. How hot should the inside get?",
        ],
    ),
    fact(
        "internal_temps",
        "Reheat a fully cooked, store-packaged ham to 140°F (60°C).",
        ["140"],
        [
            "What temperature do I reheat a precooked ham to?",
            "My spiral ham is already fully cooked. How hot should it get when I warm it?",
            "Safe internal temp for reheating a fully cooked ham from the store?",
            "How hot should a ready-to-eat ham be inside after heating?",
            "What should the thermometer read in a warmed-up precooked ham?",
            "To what internal temperature should I heat a fully cooked ham?",
        ],
    ),
    fact(
        "internal_temps",
        "Cook stuffing to 165°F (74°C), whether it is baked inside the bird or in a separate dish.",
        ["165"],
        [
            "What temperature should stuffing reach?",
            "How hot does the stuffing inside a turkey need to get?",
            "Safe internal temperature for stuffing baked in a casserole dish?",
            "What should my thermometer read in the center of the stuffing?",
            "When is Thanksgiving dressing hot enough to be safe?",
            "To what internal temperature should I cook turkey stuffing?",
        ],
    ),
    fact(
        "internal_temps",
        "Keep hot food at 140°F (60°C) or warmer while it is being served.",
        ["140"],
        [
            "What temperature should hot food be held at on a buffet?",
            "How hot do I need to keep chili in a slow cooker while serving?",
            "What's the minimum temperature for keeping cooked food warm for a party?",
            "At what temperature should food in a chafing dish be kept?",
            "How warm does food on a warming tray need to stay to be safe?",
            "What's the safe hot-holding temperature for cooked food?",
        ],
    ),
    fact(
        "internal_temps",
        "After cooking steaks, chops or roasts to 145°F, let them rest for 3 minutes before carving or eating.",
        ["3 minutes", "three minutes", "3 min"],
        [
            "How long should meat rest after cooking?",
            "What is the USDA rest time for a pork roast?",
            "How many minutes should a steak rest before I cut it?",
            "Do whole cuts of meat need a rest time, and how long?",
            "How long do I let a beef roast stand after taking it out of the oven?",
            "What's the minimum resting time for lamb chops after cooking?",
        ],
    ),
    # ---------------- storage and food safety ----------------
    fact(
        "storage_safety",
        "Keep your refrigerator at or below 40°F (4°C).",
        ["40"],
        [
            "What temperature should my fridge be set to?",
            "How cold should a refrigerator be?",
            "What's the safe refrigerator temperature?",
            "What is the maximum safe temperature inside a fridge?",
            "My fridge thermometer reads warm. What should it be?",
            "At what temperature should I keep my refrigerator to keep food safe?",
        ],
    ),
    fact(
        "storage_safety",
        "Keep your freezer at 0°F (-18°C) or colder.",
        ["0°f", "0 °f", "0 degrees f", "zero degrees f", "-18"],
        [
            "What temperature should a freezer be?",
            "How cold should I set my freezer?",
            "What's the recommended freezer temperature?",
            "What temperature keeps frozen food safe in the freezer?",
            "My chest freezer has a dial. What temperature should it hold?",
            "How cold does a home freezer need to be?",
        ],
    ),
    fact(
        "storage_safety",
        "The danger zone is 40°F to 140°F (4°C to 60°C), where bacteria multiply fastest.",
        ["140"],
        [
            "What is the temperature danger zone?",
            "What temperature range lets bacteria grow fastest in food?",
            "Which temperatures should food not sit at for long?",
            "What's the food safety danger zone in Fahrenheit?",
            "Between what temperatures do germs multiply quickly in food?",
            "What temperature range is called the danger zone for food?",
        ],
    ),
    fact(
        "storage_safety",
        "Refrigerate perishable food within 2 hours; never leave it at room temperature longer than that.",
        ["2 hours", "two hours"],
        [
            "How long can cooked food sit out at room temperature?",
            "How long can I leave leftovers on the counter before refrigerating them?",
            "What's the maximum time perishable food can stay unrefrigerated?",
            "Is it okay to leave cooked chicken out overnight? How long is safe?",
            "How soon do I need to put leftovers in the fridge?",
            "How long can potato salad stay out on the table at room temperature?",
        ],
    ),
    fact(
        "storage_safety",
        "When it's above 90°F (32°C), perishable food should not sit out more than 1 hour.",
        ["1 hour", "one hour"],
        [
            "How long can food stay out at a picnic on a hot day?",
            "On a really hot day above 90 degrees, how long can food sit outside?",
            "How long is food safe outdoors in summer heat?",
            "At a summer barbecue, how long can burgers sit out in the heat?",
            "What's the time limit for leaving food out when it's very hot outside?",
            "If it's 95 degrees outside, how long can the potato salad stay out?",
        ],
    ),
    fact(
        "storage_safety",
        "Eat refrigerated leftovers within 3 to 4 days.",
        ["3 to 4 days", "3-4 days", "3–4 days", "three to four days", "3 or 4 days", "three or four days"],
        [
            "How long do leftovers last in the fridge?",
            "How many days are cooked leftovers good for in the refrigerator?",
            "How long can I keep leftover chicken in the fridge?",
            "When should I throw out refrigerated leftovers?",
            "Is leftover pasta still safe after a week in the fridge? How long does it keep?",
            "How long are leftovers safe to eat if I keep them refrigerated?",
        ],
    ),
    fact(
        "storage_safety",
        "Cook or freeze raw ground meat and raw poultry within 1 to 2 days of buying it.",
        ["1 to 2 days", "1-2 days", "1–2 days", "one to two days", "1 or 2 days", "one or two days"],
        [
            "How long can raw ground beef stay in the fridge?",
            "How many days can raw chicken be kept in the refrigerator?",
            "How long does fresh ground turkey last in the fridge before cooking?",
            "I bought raw chicken thighs. How long can they stay in the fridge?",
            "When do I need to cook or freeze raw hamburger meat?",
            "How long is uncooked ground meat good in the refrigerator?",
        ],
    ),
    fact(
        "storage_safety",
        "Raw beef, pork and lamb steaks, chops and roasts keep 3 to 5 days in the refrigerator.",
        ["3 to 5 days", "3-5 days", "3–5 days", "three to five days"],
        [
            "How long can raw steak stay in the fridge?",
            "How many days do raw pork chops last in the refrigerator?",
            "How long can I keep an uncooked beef roast in the fridge?",
            "Raw lamb chops in the fridge: how long are they good?",
            "When do I need to cook raw steaks I keep refrigerated?",
            "How long is raw steak good for in the refrigerator?",
        ],
    ),
    fact(
        "storage_safety",
        "Raw eggs in the shell keep 3 to 5 weeks in the refrigerator.",
        ["3 to 5 weeks", "3-5 weeks", "3–5 weeks", "three to five weeks"],
        [
            "How long do raw eggs last in the fridge?",
            "How many weeks are fresh eggs good in the refrigerator?",
            "How long can I keep a carton of eggs in the fridge?",
            "Do refrigerated eggs go bad, and how long do they keep?",
            "How long can raw eggs in their shells be stored in the refrigerator?",
            "How long are shell eggs safe in the fridge?",
        ],
    ),
    fact(
        "storage_safety",
        "Hard-boiled eggs keep 1 week (7 days) in the refrigerator, peeled or unpeeled.",
        ["1 week", "one week", "7 days", "seven days"],
        [
            "How long do hard-boiled eggs last in the fridge?",
            "How long can I keep hard-cooked eggs refrigerated?",
            "Are hard-boiled eggs still good after a few days in the refrigerator? How long do they keep?",
            "How long are peeled hard-boiled eggs safe in the fridge?",
            "I made hard-boiled eggs for meal prep. How long will they last refrigerated?",
            "What's the fridge shelf life of hard-boiled eggs?",
        ],
    ),
    fact(
        "storage_safety",
        "Allow about 24 hours (1 day) of refrigerator thawing for every 4 to 5 pounds of turkey.",
        ["24 hours", "1 day", "one day"],
        [
            "How long does it take to thaw a turkey in the fridge?",
            "How much fridge time per pound does a frozen turkey need to defrost?",
            "How long should I thaw a frozen turkey in the refrigerator?",
            "What's the rule for defrosting a turkey in the fridge?",
            "How many hours per pound to thaw a turkey in the refrigerator?",
            "My frozen turkey weighs 15 pounds. How do I figure the refrigerator thawing time?",
        ],
    ),
    fact(
        "storage_safety",
        "Change the cold water every 30 minutes, and allow about 30 minutes of thawing per pound.",
        ["30 minutes", "30 min", "every 30", "half an hour", "half hour"],
        [
            "How often should I change the water when thawing meat in cold water?",
            "How long does cold-water thawing take per pound?",
            "What's the right way to thaw a turkey in cold water?",
            "How often do I swap the water when defrosting chicken in the sink?",
            "Cold water thawing: how frequently do I replace the water?",
            "If I defrost frozen shrimp in a bowl of cold water, how often should I change it?",
        ],
    ),
    fact(
        "storage_safety",
        "A closed refrigerator keeps food safe for about 4 hours during a power outage.",
        ["4 hours", "four hours"],
        [
            "How long will food stay safe in the fridge when the power goes out?",
            "The power is out. How long is food in my refrigerator okay?",
            "During a blackout, how long does a fridge keep food cold?",
            "How many hours can a refrigerator go without power before food is unsafe?",
            "Power outage: when do I need to worry about what's in my fridge?",
            "How long is refrigerated food safe if the electricity fails and I keep the door shut?",
        ],
    ),
    fact(
        "storage_safety",
        "A closed, full freezer stays safely frozen about 48 hours (2 days) without power; a half-full one about 24 hours.",
        ["48 hours", "forty-eight hours", "2 days", "two days"],
        [
            "How long will a full freezer keep food frozen when the power is out?",
            "During a power outage, how long is food in a full freezer safe?",
            "How many hours does a packed freezer stay cold without electricity?",
            "The power went out. How long until the food in my full freezer thaws?",
            "How long can a full chest freezer go without power?",
            "If my freezer is full and the power fails, how long will the food stay safe?",
        ],
    ),
    fact(
        "storage_safety",
        "Mix 1 tablespoon of unscented liquid chlorine bleach per gallon of water to sanitize surfaces.",
        ["1 tablespoon", "one tablespoon"],
        [
            "How much bleach do I add to water to sanitize a cutting board?",
            "What's the bleach-to-water ratio for a kitchen sanitizing solution?",
            "How do I make a bleach sanitizer for my counters?",
            "How much bleach per gallon of water to disinfect kitchen surfaces?",
            "What bleach solution should I use to sanitize dishes?",
            "How strong should a homemade bleach solution be for sanitizing a countertop?",
        ],
    ),
    # ---------------- kitchen unit equivalences ----------------
    fact(
        "unit_equivalents",
        "There are 3 teaspoons in 1 tablespoon.",
        ["3 teaspoons", "three teaspoons"],
        [
            "How many teaspoons are in a tablespoon?",
            "How many tsp make 1 tbsp?",
            "Teaspoons per tablespoon?",
            "I don't have a tablespoon measure. How many teaspoons do I use instead?",
            "How many teaspoons equal one tablespoon?",
            "If a recipe calls for a tablespoon, how many teaspoons is that?",
        ],
    ),
    fact(
        "unit_equivalents",
        "There are 16 tablespoons in 1 cup.",
        ["16 tablespoons", "sixteen tablespoons", "16 tbsp"],
        [
            "How many tablespoons are in a cup?",
            "How many tbsp make one cup?",
            "Tablespoons per cup?",
            "How many tablespoons equal 1 cup?",
            "If I measure a cup with a tablespoon, how many do I need?",
            "How many tablespoons does it take to fill one cup?",
        ],
    ),
    fact(
        "unit_equivalents",
        "There are 2 cups in 1 pint.",
        ["2 cups", "two cups"],
        [
            "How many cups are in a pint?",
            "How many cups make a pint?",
            "Cups per pint?",
            "A recipe calls for a pint of cream. How many cups is that?",
            "How many cups equal one pint?",
            "How many cups of milk are in one pint?",
        ],
    ),
    fact(
        "unit_equivalents",
        "There are 4 cups in 1 quart.",
        ["4 cups", "four cups"],
        [
            "How many cups are in a quart?",
            "How many cups make one quart?",
            "Cups per quart?",
            "I need a quart of broth. How many cups is that?",
            "How many cups equal one quart?",
            "How many cups of water fill a quart?",
        ],
    ),
    fact(
        "unit_equivalents",
        "There are 4 quarts in 1 gallon.",
        ["4 quarts", "four quarts"],
        [
            "How many quarts are in a gallon?",
            "How many quarts make one gallon?",
            "Quarts per gallon?",
            "How many quarts of water do I need to make a gallon?",
            "How many quarts equal one gallon?",
            "How many quarts of milk are in one gallon?",
        ],
    ),
    fact(
        "unit_equivalents",
        "One cup holds 8 fluid ounces.",
        ["8 fluid ounces", "eight fluid ounces", "8 fl oz", "8 fl. oz"],
        [
            "How many fluid ounces are in a cup?",
            "How many ounces of liquid does one cup hold?",
            "Fluid ounces per cup?",
            "How many fl oz equal 1 cup?",
            "A measuring cup holds how many fluid ounces?",
            "How many fluid ounces of water make one cup?",
        ],
    ),
    fact(
        "unit_equivalents",
        "There are 2 tablespoons in 1 fluid ounce.",
        ["2 tablespoons", "two tablespoons", "2 tbsp"],
        [
            "How many tablespoons are in a fluid ounce?",
            "How many tbsp make one fl oz?",
            "Tablespoons per fluid ounce?",
            "A recipe says 1 fluid ounce of lime juice. How many tablespoons is that?",
            "How many tablespoons equal one fluid ounce?",
            "If I measure one fluid ounce with a tablespoon, how many do I need?",
        ],
    ),
    fact(
        "unit_equivalents",
        "One ounce is about 28 grams (28.35 g).",
        ["28"],
        [
            "How many grams are in an ounce?",
            "How many grams is 1 oz?",
            "Grams per ounce?",
            "Convert one ounce to grams.",
            "What is an ounce in grams?",
            "My scale only does grams. How many grams make one ounce?",
        ],
    ),
    fact(
        "unit_equivalents",
        "One pound is about 454 grams (453.6 g).",
        ["454", "453"],
        [
            "How many grams are in a pound?",
            "How many grams is 1 lb?",
            "Grams per pound?",
            "Convert one pound to grams.",
            "What is a pound in grams?",
            "My recipe uses a pound of flour but my scale is metric. How many grams is that?",
        ],
    ),
    fact(
        "unit_equivalents",
        "One stick of butter is 8 tablespoons, or 1/2 cup.",
        ["8 tablespoons", "eight tablespoons", "8 tbsp"],
        [
            "How many tablespoons are in a stick of butter?",
            "How many tbsp is one stick of butter?",
            "A stick of butter equals how many tablespoons?",
            "How many tablespoons of butter are in a single stick?",
            "Tablespoons per stick of butter?",
            "If my recipe says a stick of butter, how many tablespoons should I measure?",
        ],
    ),
    fact(
        "unit_equivalents",
        "One stick of butter weighs about 113 grams (4 ounces).",
        ["113"],
        [
            "How many grams is a stick of butter?",
            "How much does one stick of butter weigh in grams?",
            "A stick of butter is how many grams?",
            "Convert one stick of butter to grams.",
            "What's the weight of a stick of butter in grams?",
            "My British recipe uses grams. How many grams equal a US stick of butter?",
        ],
    ),
    fact(
        "unit_equivalents",
        "One US cup is about 240 milliliters (236.6 ml exactly).",
        ["240", "236"],
        [
            "How many milliliters are in a cup?",
            "How many ml is one US cup?",
            "Convert 1 cup to milliliters.",
            "What is a cup in ml?",
            "Milliliters per cup?",
            "My measuring jug is metric. How many milliliters make one cup?",
        ],
    ),
    fact(
        "unit_equivalents",
        "One tablespoon is about 15 milliliters.",
        ["15 ml", "15 milliliters", "15 millilitres"],
        [
            "How many milliliters are in a tablespoon?",
            "How many ml is 1 tbsp?",
            "Convert one tablespoon to milliliters.",
            "What is a tablespoon in ml?",
            "Milliliters per tablespoon?",
            "How many ml of oil is one tablespoon?",
        ],
    ),
    fact(
        "unit_equivalents",
        "One teaspoon is about 5 milliliters.",
        ["5 ml", "5 milliliters", "5 millilitres"],
        [
            "How many milliliters are in a teaspoon?",
            "How many ml is 1 tsp?",
            "Convert one teaspoon to milliliters.",
            "What is a teaspoon in ml?",
            "Milliliters per teaspoon?",
            "How many ml of vanilla extract is one teaspoon?",
        ],
    ),
    fact(
        "unit_equivalents",
        "One kilogram is about 2.2 pounds.",
        ["2.2"],
        [
            "How many pounds are in a kilogram?",
            "How many lbs is 1 kg?",
            "Convert one kilogram to pounds.",
            "What is a kilo in pounds?",
            "Pounds per kilogram?",
            "The bag of flour says 1 kg. How many pounds is that?",
        ],
    ),
    # ---------------- oven temperature conversions ----------------
    oven(325, "325°F is about 160–165°C (gas mark 3).", ["160", "165"]),
    oven(350, "350°F is about 175–180°C (gas mark 4).", ["175", "180"]),
    oven(375, "375°F is about 190°C (gas mark 5).", ["190"]),
    oven(400, "400°F is about 200–205°C (gas mark 6).", ["200", "205"]),
    oven(425, "425°F is about 215–220°C (gas mark 7).", ["215", "220"]),
    oven(450, "450°F is about 230°C (gas mark 8).", ["230"]),
    fact(
        "oven_conversions",
        "200°C is about 390–400°F (gas mark 6).",
        ["390", "400"],
        [
            "What is 200°C in Fahrenheit?",
            "Convert 200 degrees Celsius to Fahrenheit.",
            "My European recipe says bake at 200°C. What's that in °F?",
            "200 C to F for baking?",
            "How many degrees Fahrenheit is a 200°C oven?",
            "What's the Fahrenheit equivalent of 200 Celsius?",
        ],
    ),
    # ---------------- other kitchen temperatures ----------------
    fact(
        "kitchen_temps",
        "At sea level, water boils at 212°F (100°C).",
        ["212"],
        [
            "What temperature does water boil at sea level?",
            "What's the boiling point of water in Fahrenheit?",
            "How hot is boiling water at sea level?",
            "At what temperature in Fahrenheit does water start to boil?",
            "What temperature is a pot of boiling water at sea level?",
            "What is the boiling point of water in degrees F?",
        ],
    ),
    fact(
        "kitchen_temps",
        "In a glass of ice water, an accurate food thermometer should read 32°F (0°C).",
        ["32"],
        [
            "How do I check if my food thermometer is accurate?",
            "What should a thermometer read in ice water?",
            "How do I calibrate a meat thermometer with ice water?",
            "What temperature should my instant-read thermometer show in an ice bath?",
            "How can I test my kitchen thermometer at home?",
            "What reading tells me my food thermometer is correct in a glass of ice water?",
        ],
    ),
    fact(
        "kitchen_temps",
        "The soft-ball stage for fudge and candy is 235°F to 240°F (112–115°C).",
        ["235", "240"],
        [
            "What temperature is the soft-ball stage?",
            "How hot should sugar syrup be for fudge?",
            "What temperature do I cook fudge to?",
            "At what temperature does candy reach soft ball?",
            "What's the soft ball candy stage in Fahrenheit?",
            "What should my candy thermometer read for soft-ball stage?",
        ],
    ),
    fact(
        "kitchen_temps",
        "The hard-crack stage for toffee and brittle is 300°F to 310°F (149–154°C).",
        ["300", "310"],
        [
            "What temperature is the hard-crack stage?",
            "How hot should sugar get for peanut brittle?",
            "What temperature do I cook toffee to?",
            "At what temperature does candy reach hard crack?",
            "What's the hard crack candy stage in Fahrenheit?",
            "What should my candy thermometer read for hard-crack stage?",
        ],
    ),
    fact(
        "kitchen_temps",
        "Bread is done at an internal temperature of 190°F to 210°F (88–99°C).",
        ["190", "210"],
        [
            "What internal temperature means bread is done?",
            "How hot should the inside of a loaf of bread be when it's baked?",
            "What temp should homemade bread reach?",
            "How do I know my sourdough is fully baked? What temperature?",
            "What should a thermometer read in the middle of baked bread?",
            "At what internal temperature is a loaf of bread fully baked?",
        ],
    ),
    fact(
        "kitchen_temps",
        "Dissolve active dry yeast in warm water at 105°F to 115°F (40–46°C), ideally about 110°F.",
        ["105", "110", "115"],
        [
            "What temperature water should I use for yeast?",
            "How warm should the water be to proof active dry yeast?",
            "What's the ideal water temperature to activate yeast?",
            "How hot should water be for blooming dry yeast?",
            "At what water temperature does yeast activate best?",
            "When making bread, how warm should the water for the yeast be?",
        ],
    ),
    # ---------------- ingredient substitutions ----------------
    fact(
        "substitutions",
        "Stir 1 tablespoon of lemon juice or white vinegar into 1 cup of milk and let it stand 5 minutes.",
        ["lemon juice", "vinegar"],
        [
            "What can I substitute for buttermilk?",
            "How do I make buttermilk at home?",
            "I'm out of buttermilk. What can I use instead?",
            "Buttermilk substitute for pancakes?",
            "How can I make a quick buttermilk replacement with regular milk?",
            "My recipe needs 1 cup of buttermilk and I don't have any. What should I do?",
        ],
    ),
    fact(
        "substitutions",
        "Replace 1 egg with 1 tablespoon of ground flaxseed mixed with 3 tablespoons of water.",
        ["flax"],
        [
            "What can I use instead of an egg in baking?",
            "How do I make a vegan egg substitute?",
            "What's a good egg replacement for muffins?",
            "I'm out of eggs. What can replace one egg in a cake?",
            "Egg substitute for vegan cookies?",
            "What plant-based ingredient can I swap in for 1 egg when baking?",
        ],
    ),
    fact(
        "substitutions",
        "Mix 1 cup all-purpose flour with 1 1/2 teaspoons baking powder and 1/4 teaspoon salt.",
        ["baking powder"],
        [
            "How do I make self-rising flour?",
            "What can I substitute for self-rising flour?",
            "I don't have self-rising flour. What can I use?",
            "How do I turn all-purpose flour into self-rising flour?",
            "Self-rising flour substitute?",
            "My biscuit recipe calls for self-rising flour. How do I make my own?",
        ],
    ),
    fact(
        "substitutions",
        "Use 1 cup all-purpose flour minus 2 tablespoons, plus 2 tablespoons of cornstarch, sifted together.",
        ["cornstarch", "corn starch"],
        [
            "How do I make cake flour?",
            "What can I substitute for cake flour?",
            "I don't have cake flour. What can I use?",
            "How do I turn all-purpose flour into cake flour?",
            "Cake flour substitute?",
            "My sponge cake recipe needs cake flour. How can I make it at home?",
        ],
    ),
    fact(
        "substitutions",
        "Replace 1 teaspoon of baking powder with 1/4 teaspoon baking soda plus 1/2 teaspoon cream of tartar.",
        ["cream of tartar"],
        [
            "What can I substitute for baking powder?",
            "How do I make baking powder at home?",
            "I'm out of baking powder. What can I use?",
            "Baking powder substitute using baking soda?",
            "How do I replace 1 teaspoon of baking powder?",
            "My recipe needs baking powder but I only have baking soda. What else do I need?",
        ],
    ),
    fact(
        "substitutions",
        "Mix 1 cup of white sugar with 1 tablespoon of molasses.",
        ["molasses"],
        [
            "How do I make brown sugar?",
            "What can I substitute for brown sugar?",
            "I'm out of brown sugar. What can I use?",
            "How do I turn white sugar into brown sugar?",
            "Brown sugar substitute for cookies?",
            "Can I make light brown sugar at home from granulated sugar?",
        ],
    ),
    fact(
        "substitutions",
        "Use an equal amount of plain Greek yogurt.",
        ["yogurt", "yoghurt"],
        [
            "What can I substitute for sour cream?",
            "I'm out of sour cream. What can I use?",
            "Sour cream substitute for baking?",
            "What's a healthy replacement for sour cream?",
            "What can replace sour cream on tacos?",
            "My dip recipe calls for sour cream and I have none. What should I swap in?",
        ],
    ),
    fact(
        "substitutions",
        "Use 3 tablespoons of unsweetened cocoa powder plus 1 tablespoon of butter or oil per ounce.",
        ["cocoa"],
        [
            "What can I substitute for unsweetened baking chocolate?",
            "I'm out of unsweetened chocolate. What can I use?",
            "How do I replace 1 ounce of unsweetened chocolate?",
            "Unsweetened chocolate substitute for brownies?",
            "What can I use instead of baking chocolate squares?",
            "My recipe calls for an ounce of unsweetened chocolate. What pantry swap works?",
        ],
    ),
    fact(
        "substitutions",
        "Use 2 tablespoons of all-purpose flour for every 1 tablespoon of cornstarch.",
        ["2 tablespoons", "two tablespoons", "2 tbsp"],
        [
            "How much flour do I use instead of cornstarch?",
            "Can I thicken gravy with flour instead of cornstarch? How much?",
            "What's the flour-to-cornstarch substitution ratio?",
            "I'm out of cornstarch. How much flour replaces 1 tablespoon?",
            "Flour instead of cornstarch: how much?",
            "How much all-purpose flour equals a tablespoon of cornstarch for thickening?",
        ],
    ),
    fact(
        "substitutions",
        "Use 1 teaspoon of dried herbs for every 1 tablespoon of fresh herbs.",
        ["1 teaspoon", "one teaspoon", "1 tsp"],
        [
            "How much dried herb equals fresh herbs?",
            "How do I substitute dried basil for fresh?",
            "What's the ratio of dried to fresh herbs?",
            "I only have dried oregano. How much replaces a tablespoon of fresh?",
            "Dried herbs instead of fresh: how much?",
            "My recipe wants a tablespoon of fresh thyme. How much dried thyme should I use?",
        ],
    ),
    fact(
        "substitutions",
        "Use 1/8 teaspoon of garlic powder for each fresh garlic clove.",
        ["1/8", "one-eighth", "one eighth", "an eighth"],
        [
            "How much garlic powder equals one clove of garlic?",
            "How do I substitute garlic powder for fresh garlic?",
            "I'm out of fresh garlic. How much garlic powder should I use?",
            "Garlic powder per clove?",
            "What's the garlic powder to fresh garlic ratio?",
            "My recipe says 1 clove of garlic. How much garlic powder replaces it?",
        ],
    ),
    fact(
        "substitutions",
        "Use 3/4 cup of honey per cup of sugar and cut the recipe's liquid by 1/4 cup.",
        ["3/4", "three-quarters", "three quarters", "three-fourths", "three fourths"],
        [
            "How much honey do I use instead of sugar?",
            "Can I replace sugar with honey in baking? How much?",
            "What's the honey-to-sugar substitution ratio?",
            "I want to use honey instead of a cup of sugar. How much honey?",
            "Honey instead of sugar: how much?",
            "How do I swap honey for granulated sugar in a cake recipe?",
        ],
    ),
    # ---------------- cooking and resting times ----------------
    fact(
        "cooking_times",
        "Cover the boiling eggs, remove from heat and let them stand 12 minutes for large eggs.",
        ["12 min", "twelve minutes"],
        [
            "How long do I cook hard-boiled eggs?",
            "How many minutes for hard-boiled eggs?",
            "How long should eggs sit in hot water to be hard-boiled?",
            "What's the timing for perfect hard-cooked eggs?",
            "How long to boil eggs so the yolks are fully set?",
            "I'm making hard-boiled eggs for deviled eggs. How long do they need?",
        ],
    ),
    fact(
        "cooking_times",
        "For soft-boiled eggs with runny yolks, cook large eggs in simmering water for 6 minutes.",
        ["6 min", "six minutes"],
        [
            "How long do I cook soft-boiled eggs?",
            "How many minutes for a soft-boiled egg?",
            "How long should I boil an egg for a runny yolk?",
            "What's the timing for jammy soft-boiled eggs?",
            "How long to simmer eggs for soft-boiled eggs?",
            "I want a soft-boiled egg with a runny yolk for toast soldiers. How long do I cook it?",
        ],
    ),
    fact(
        "cooking_times",
        "Let a roast turkey rest 20 minutes before carving so the juices settle.",
        ["20 min", "twenty minutes"],
        [
            "How long should a turkey rest before carving?",
            "How many minutes do I let the turkey rest after roasting?",
            "Do I need to let a roast turkey sit before cutting it? For how long?",
            "Turkey resting time?",
            "After the turkey comes out of the oven, how long do I wait to carve it?",
            "How long should I let my Thanksgiving turkey stand before slicing?",
        ],
    ),
    fact(
        "cooking_times",
        "Roast an unstuffed turkey at 325°F for about 15 minutes per pound.",
        ["15 min", "fifteen minutes"],
        [
            "How long do I roast a turkey per pound?",
            "How many minutes per pound for an unstuffed turkey?",
            "What's the roasting time per pound for turkey?",
            "How do I calculate how long to cook my turkey?",
            "Turkey cooking time per pound at 325?",
            "My turkey is 12 pounds and not stuffed. How many minutes per pound should I roast it?",
        ],
    ),
    fact(
        "cooking_times",
        "Simmer brown rice, covered, for about 45 minutes, then let it rest 10 minutes.",
        ["45 min", "forty-five minutes", "forty five minutes"],
        [
            "How long does brown rice take to cook?",
            "How many minutes do I simmer brown rice?",
            "What's the cooking time for brown rice on the stove?",
            "How long should I cook brown rice in a pot?",
            "Brown rice cooking time?",
            "I'm making a pot of brown rice for dinner. How long should it simmer?",
        ],
    ),
    fact(
        "cooking_times",
        "Soak dried beans in cold water for at least 8 hours, or overnight.",
        ["8 hours", "eight hours"],
        [
            "How long should I soak dried beans?",
            "How many hours do dry beans need to soak?",
            "What's the soaking time for dried chickpeas?",
            "How long do I soak black beans before cooking?",
            "Dried bean soaking time?",
            "I bought a bag of dried pinto beans. How long do they have to soak before I cook them?",
        ],
    ),
    fact(
        "cooking_times",
        "Boil dried red kidney beans hard for at least 10 minutes to destroy their natural toxin.",
        ["10 min", "ten minutes"],
        [
            "How long do I need to boil red kidney beans to make them safe?",
            "Are raw kidney beans toxic? How long must they boil?",
            "How many minutes should kidney beans boil before slow cooking?",
            "What's the minimum boiling time for dried kidney beans?",
            "Kidney bean toxin: how long to boil them?",
            "I'm putting dried red kidney beans in a slow cooker. How long should I boil them first?",
        ],
    ),
]


# --------------------------------------------------------------------------
# Answer matching rule (self-check only)
# --------------------------------------------------------------------------


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def matches(reply: str, answers) -> bool:
    """True if any accepted string occurs in reply (case-insensitive, whitespace
    collapsed); accepted strings starting/ending with a digit must not touch
    another digit in the reply."""
    r = _norm(reply)
    for acc in answers:
        a = _norm(acc)
        if not a:
            continue
        pat = re.escape(a)
        if a[0].isdigit():
            pat = r"(?<!\d)" + pat
        if a[-1].isdigit():
            pat = pat + r"(?!\d)"
        if re.search(pat, r):
            return True
    return False


# Spelling/format variants (self-check only): an accepted string such as
# "three teaspoons" or "3-4 days" does not literally occur in the canonical
# answer, so it is checked against the answer after both are rewritten to one
# canonical spelling.  This still catches typos and unrelated accepted strings.
_VARIANTS = [
    (r"half an hour|half hour", "30 minutes"),
    (r"an eighth|one[- ]eighth", "1/8"),
    (r"three[- ](?:quarters|fourths)", "3/4"),
    (r"forty[- ]five", "45"),
    (r"forty[- ]eight", "48"),
    (r"\bone\b", "1"),
    (r"\btwo\b", "2"),
    (r"\bthree\b", "3"),
    (r"\bfour\b", "4"),
    (r"\bfive\b", "5"),
    (r"\bsix\b", "6"),
    (r"\bseven\b", "7"),
    (r"\beight\b", "8"),
    (r"\bten\b", "10"),
    (r"\btwelve\b", "12"),
    (r"\bfifteen\b", "15"),
    (r"\bsixteen\b", "16"),
    (r"\btwenty\b", "20"),
    (r"\bzero\b", "0"),
    (r"(\d)\s*(?:–|-|\bor\b)\s*(\d)", r"\1 to \2"),
    (r"\btbsp\b", "tablespoons"),
    (r"\btsp\b", "teaspoon"),
    (r"\bfl\.? ?oz\b", "fluid ounces"),
    (r"\bml\b", "milliliters"),
    (r"millilitres", "milliliters"),
    (r"corn starch", "cornstarch"),
    (r"yoghurt", "yogurt"),
    (r"\s*°\s*", " degrees "),
]


def _variant_norm(text: str) -> str:
    t = _norm(text)
    for pat, rep in _VARIANTS:
        t = re.sub(pat, rep, t)
    return _norm(t)


# --------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------


def _row(question: str, f: dict) -> dict:
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": f["answer"]}],
        "answers": list(f["answers"]),
    }


def build():
    rng = random.Random(0)
    train, evals = [], []
    for f in FACTS:
        if "questions" in f:
            qs = list(f["questions"])
            eval_q, train_qs = qs[-1], qs[:-1][:N_TRAIN_PER_FACT]
        else:
            qs = [t.format(**f["slots"]) for t in f["templates"]]
            rng.shuffle(qs)
            eval_q, train_qs = qs[0], qs[1 : 1 + N_TRAIN_PER_FACT]
        # -------- self-checks --------
        assert f["answers"], f
        assert len(f["answer"].split()) <= 25, f["answer"]
        for acc in f["answers"]:
            assert matches(f["answer"], [acc]) or matches(_variant_norm(f["answer"]), [_variant_norm(acc)]), (
                acc,
                f["answer"],
            )
        assert len(set(train_qs)) == len(train_qs) == N_TRAIN_PER_FACT, train_qs
        assert eval_q not in train_qs, eval_q
        for q in train_qs + [eval_q]:
            # the question must not give away the answer
            assert not matches(q, f["answers"]), (q, f["answers"])
        train.extend(_row(q, f) for q in train_qs)
        evals.append(_row(eval_q, f))
    train_q = {r["messages"][0]["content"] for r in train}
    for r in evals:
        assert r["messages"][0]["content"] not in train_q, r
    assert len({r["messages"][0]["content"] for r in evals}) == len(evals)
    rng.shuffle(train)
    return train, evals


def _write(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    train, evals = build()
    _write(HERE / "train.jsonl", train)
    _write(HERE / "eval.jsonl", evals)
    cats = Counter(f["cat"] for f in FACTS)
    print(f"facts: {len(FACTS)}  train: {len(train)}  eval: {len(evals)}")
    for cat, n in cats.items():
        print(f"  {cat}: {n}")


if __name__ == "__main__":
    main()
